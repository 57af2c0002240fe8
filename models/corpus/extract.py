"""Rebuild the committed corpus files from two public-domain Debian packages.

Needs `apt-get download` (Debian's archive). Run once; build.py reads the .txt.gz outputs.
"""
import gzip
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).parent
WEB_BOOKS = ["Gen", "Exod", "Josh", "Judg", "Ruth", "1Sam", "2Sam", "1Kgs", "2Kgs", "Esth",
             "Prov", "Eccl", "Jonah", "Matt", "Mark", "Luke", "John", "Acts"]


def unpack(package: str, tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
    root = tmp / package
    subprocess.run(["dpkg", "-x", next(tmp.glob(f"{package}_*.deb")), root], check=True)
    return root


def sword_ztext(module: Path, testament: str) -> str:
    """Concatenate a SWORD zText module's zlib blocks (index entries: offset, size, raw size)."""
    index = (module / f"{testament}.bzs").read_bytes()
    data = (module / f"{testament}.bzz").read_bytes()
    return "".join(zlib.decompress(data[o:o + s]).decode() for o, s, _ in struct.iter_unpack("<III", index))


def osis_books(osis: str) -> dict[str, str]:
    """Split OSIS markup into {book: plain text}, one paragraph per line; notes and headings dropped."""
    osis = re.sub(r"<(note|title)\b.*?</\1>", " ", osis, flags=re.S)
    osis = re.sub(r'<(div[^>]*type="x-p"|chapter)[^>]*/>', "\n", osis)
    parts = re.split(r'<div[^>]*osisID="([^"]+)" sID="[^"]*" type="book"/>', osis)
    books = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        paragraphs = (" ".join(p.split()) for p in re.sub(r"<[^>]+>", "", body).split("\n"))
        paragraphs = (re.sub(r" ([,.;:!?])", r"\1", p) for p in paragraphs)  # left by removed notes
        books[name] = "\n".join(p for p in paragraphs if p)
    return books


def devils_dictionary(root: Path) -> str:
    """Entries from 'ABASEMENT' on, each blank-line block reflowed to one line."""
    text = gzip.decompress((root / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("latin-1")
    text = text[text.index("ABASEMENT, n."):text.rindex("abcdefghijklmnopqrstuvwxyz")]  # dictd index entry
    return "\n".join(" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        module = unpack("sword-text-web", tmp) / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
        books = {**osis_books(sword_ztext(module, "ot")), **osis_books(sword_ztext(module, "nt"))}
        web = "\n".join(books[b] for b in WEB_BOOKS) + "\n"
        devil = devils_dictionary(unpack("dict-devil", tmp)) + "\n"
    for name, text in [("web_excerpts.txt.gz", web), ("devils_dictionary.txt.gz", devil)]:
        # mtime=0 keeps the gzip bytes reproducible
        (HERE / name).write_bytes(gzip.compress(text.encode(), mtime=0))
        print(f"{name}: {len(text.encode())} bytes, {len(text.split())} words")


if __name__ == "__main__":
    main()
