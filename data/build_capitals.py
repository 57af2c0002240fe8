"""Generate a task SmolLM2 already knows: data/capitals/{train,valid,test}.jsonl.

"What is the capital of France?" -> "Paris". The answers are facts the model learned in pretraining;
what it lacks is the answer's shape (it writes a sentence). Three examples in the prompt show the
shape as well as training does, so this is the README's case where prompting is enough. Every split
holds different countries (names in ASCII, one capital each; countries whose capital is disputed or
split are left out). Run `python data/build_capitals.py`; the output is the same on every run.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "capitals"
SEED = 20261202
SPLITS = {"test": 40, "valid": 10}  # countries; the rest train

CAPITALS = """France: Paris; Germany: Berlin; Italy: Rome; Spain: Madrid; Portugal: Lisbon; United Kingdom: London;
Ireland: Dublin; Netherlands: Amsterdam; Belgium: Brussels; Austria: Vienna; Switzerland: Bern; Poland: Warsaw;
Czech Republic: Prague; Hungary: Budapest; Greece: Athens; Sweden: Stockholm; Norway: Oslo;
Denmark: Copenhagen; Finland: Helsinki; Iceland: Reykjavik; Russia: Moscow; Ukraine: Kyiv; Romania: Bucharest;
Bulgaria: Sofia; Serbia: Belgrade; Croatia: Zagreb; Turkey: Ankara; Egypt: Cairo; Kenya: Nairobi;
Nigeria: Abuja; Ethiopia: Addis Ababa; Morocco: Rabat; Algeria: Algiers; Tunisia: Tunis; Ghana: Accra;
Senegal: Dakar; Japan: Tokyo; China: Beijing; South Korea: Seoul; India: New Delhi; Pakistan: Islamabad;
Bangladesh: Dhaka; Thailand: Bangkok; Vietnam: Hanoi; Indonesia: Jakarta; Philippines: Manila;
Malaysia: Kuala Lumpur; Australia: Canberra; New Zealand: Wellington; Canada: Ottawa; Mexico: Mexico City;
Brazil: Brasilia; Argentina: Buenos Aires; Chile: Santiago; Peru: Lima; Colombia: Bogota; Venezuela: Caracas;
Cuba: Havana; Iran: Tehran; Iraq: Baghdad; Saudi Arabia: Riyadh; Syria: Damascus; Lebanon: Beirut;
Jordan: Amman; Afghanistan: Kabul; Nepal: Kathmandu; Mongolia: Ulaanbaatar; Qatar: Doha; Kazakhstan: Astana;
Uzbekistan: Tashkent; Ecuador: Quito; Uruguay: Montevideo; Paraguay: Asuncion; Jamaica: Kingston;
Estonia: Tallinn; Latvia: Riga; Lithuania: Vilnius; Slovakia: Bratislava; Slovenia: Ljubljana; Malta: Valletta;
Cyprus: Nicosia; Albania: Tirana; North Macedonia: Skopje; Georgia: Tbilisi; Armenia: Yerevan;
Azerbaijan: Baku; Belarus: Minsk; Moldova: Chisinau; Myanmar: Naypyidaw; Cambodia: Phnom Penh; Laos: Vientiane;
North Korea: Pyongyang; Libya: Tripoli; Sudan: Khartoum; Uganda: Kampala; Tanzania: Dodoma; Zimbabwe: Harare;
Zambia: Lusaka; Angola: Luanda; Mozambique: Maputo; Madagascar: Antananarivo; Cameroon: Yaounde; Mali: Bamako;
Niger: Niamey; Chad: N'Djamena; Somalia: Mogadishu; Rwanda: Kigali; Panama: Panama City; Costa Rica: San Jose;
Honduras: Tegucigalpa; Nicaragua: Managua; Guatemala: Guatemala City; El Salvador: San Salvador;
Dominican Republic: Santo Domingo; Haiti: Port-au-Prince"""  # country: capital; ...

QUESTIONS = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"]


def pairs() -> list[tuple[str, str]]:
    return [tuple(item.split(": ")) for item in " ".join(CAPITALS.splitlines()).split("; ")]


def main() -> None:
    rng = random.Random(SEED)
    countries = pairs()
    rng.shuffle(countries)
    cut = {"test": countries[:SPLITS["test"]], "valid": countries[SPLITS["test"]:sum(SPLITS.values())],
           "train": countries[sum(SPLITS.values()):]}
    OUT.mkdir(exist_ok=True)
    for split, rows in cut.items():  # training rows ask each question; held-out rows one, at random
        lines = [{"prompt": q.format(country), "completion": capital} for country, capital in rows
                 for q in (QUESTIONS if split == "train" else [rng.choice(QUESTIONS)])]
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        print(f"{split}: {len(lines)} rows, {len(rows)} countries")


if __name__ == "__main__":
    main()
