"""Generate the bundled tool-calling task: data/tool_calls/{train,valid,test}.jsonl.

Six tools; each row offers three of them (the right one and two others, in random order) and a
request in everyday words. The assistant answers with one call (OpenAI `tool_calls` form). A fifth
of the training rows go on: the tool's result (a `tool` turn) and the assistant's final answer.
A call (function + arguments) is in one split only, and so is a request's wording, so the golden
set asks for calls the model never saw. Run `python data/build_tool_calls.py`; the output is the
same on every run.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "tool_calls"
SPLITS = {"test": 100, "valid": 50, "train": 800}
SEED = 20261202
FOLLOW_UP = 0.2  # share of train/valid rows with a tool result and a final answer
TOOLS_PER_ROW = 3


def tool(name: str, description: str, properties: dict, required: list) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


STR, NUM, INT = {"type": "string"}, {"type": "number"}, {"type": "integer"}
TOOLS = {t["function"]["name"]: t for t in (
    tool("get_weather", "Current weather in a city", {"city": STR, "unit": {"type": "string", "enum": [
        "celsius", "fahrenheit"]}}, ["city"]),
    tool("convert_currency", "Convert an amount between currencies (ISO codes)", {
        "amount": NUM, "from": STR, "to": STR}, ["amount", "from", "to"]),
    tool("set_timer", "Start a countdown timer", {"minutes": INT}, ["minutes"]),
    tool("search_flights", "Find flights on a date (YYYY-MM-DD)", {
        "origin": STR, "destination": STR, "date": STR}, ["origin", "destination", "date"]),
    tool("get_stock_price", "Latest price of a stock by ticker symbol", {"symbol": STR}, ["symbol"]),
    tool("translate_text", "Translate text into another language", {
        "text": STR, "target_language": STR}, ["text", "target_language"]),
)}

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Boston", "Madrid", "Berlin", "Sydney", "Toronto",
          "Nairobi", "Seoul", "Dublin", "Lisbon", "Chicago", "Mumbai", "Athens", "Vienna", "Prague", "Havana",
          "Quito", "Helsinki", "Manila", "Austin", "Seattle", "Rome", "Zurich", "Bogota", "Hanoi"]
CURRENCIES = {"USD": "dollars", "EUR": "euros", "GBP": "pounds", "JPY": "yen", "CHF": "Swiss francs",
              "CAD": "Canadian dollars", "INR": "rupees", "MXN": "pesos"}
STOCKS = {"AAPL": "Apple", "MSFT": "Microsoft", "TSLA": "Tesla", "AMZN": "Amazon", "NVDA": "Nvidia",
          "GOOGL": "Alphabet", "NFLX": "Netflix", "INTC": "Intel", "ORCL": "Oracle", "IBM": "IBM", "KO": "Coca-Cola",
          "PEP": "PepsiCo", "DIS": "Disney", "NKE": "Nike", "SBUX": "Starbucks", "ADBE": "Adobe", "AMD": "AMD",
          "PYPL": "PayPal", "UBER": "Uber", "SONY": "Sony", "SAP": "SAP", "SHOP": "Shopify", "V": "Visa",
          "WMT": "Walmart"}
PHRASES = ["good morning", "thank you very much", "where is the train station", "I would like a coffee",
           "see you tomorrow", "how much does this cost", "the meeting is at noon", "happy birthday",
           "I am lost", "the bill, please", "my name is Sam", "it is raining", "good night", "welcome home",
           "I love this city", "can you help me"]
LANGUAGES = ["Spanish", "French", "German", "Italian", "Japanese", "Portuguese", "Dutch", "Korean"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

WEATHER = ["What's the weather in {city}?", "Is it raining in {city} right now?", "How warm is it in {city}?",
           "Check the weather for {city}.", "weather {city}", "I'm heading to {city}, what's it like outside there?"]
WEATHER_UNIT = ["What's the weather in {city} in {unit}?", "Give me the temperature in {city} in {unit}.",
                "Weather for {city}, {unit} please."]
CURRENCY = ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
            "What are {amount} {src} worth in {dst}?", "I have {amount} {src}; how many {dst} is that?",
            "{amount} {src} to {dst}"]
TIMER = ["Set a timer for {n} minutes.", "Start a {n}-minute timer.", "Timer, {n} minutes please.",
         "Can you time {n} minutes for me?", "Count down {n} minutes."]
FLIGHTS = ["Find flights from {a} to {b} on {date}.", "Are there flights {a} to {b} on {date}?",
           "I need to fly from {a} to {b} on {date}.", "Search flights {a} -> {b}, {date}.",
           "Look up a flight to {b} from {a} on {date}."]
STOCK = ["What's the stock price of {sym}?", "How is {company} ({sym}) trading?", "Quote for {sym}, please.",
         "Price of {company} stock ({sym})?", "{sym} share price", "Check {sym} for me.",
         "Where is {company} ({sym}) trading today?", "Latest {sym} quote?"]
TRANSLATE = ["Translate '{text}' into {lang}.", "How do you say '{text}' in {lang}?", "'{text}' in {lang}, please.",
             "Can you put '{text}' into {lang}?"]


def weather(rng):
    city = rng.choice(CITIES)
    if rng.random() < 0.35:
        unit = rng.choice(["celsius", "fahrenheit"])
        text = rng.choice(WEATHER_UNIT).format(city=city, unit=unit.capitalize() if rng.random() < 0.5 else unit)
        return text, {"city": city, "unit": unit}
    return rng.choice(WEATHER).format(city=city), {"city": city}


def currency(rng):
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([rng.randint(1, 500), rng.randint(1, 99) * 10, round(rng.uniform(1, 300), 2)])
    say = lambda code: code if rng.random() < 0.6 else CURRENCIES[code]  # noqa: E731
    return rng.choice(CURRENCY).format(amount=amount, src=say(src), dst=say(dst)), {
        "amount": amount, "from": src, "to": dst}


def timer(rng):
    n = rng.choice([rng.randint(1, 120), rng.choice([5, 10, 15, 20, 25, 30, 45, 90])])
    return rng.choice(TIMER).format(n=n), {"minutes": n}


def flights(rng):
    a, b = rng.sample(CITIES, 2)
    year, month, day = rng.choice([2026, 2027]), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year}-{month:02d}-{day:02d}"
    written = iso if rng.random() < 0.5 else f"{MONTHS[month - 1]} {day}, {year}"
    return rng.choice(FLIGHTS).format(a=a, b=b, date=written), {"origin": a, "destination": b, "date": iso}


def stock(rng):
    sym = rng.choice(sorted(STOCKS))
    return rng.choice(STOCK).format(sym=sym, company=STOCKS[sym]), {"symbol": sym}


def translate(rng):
    text, lang = rng.choice(PHRASES), rng.choice(LANGUAGES)
    return rng.choice(TRANSLATE).format(text=text, lang=lang), {"text": text, "target_language": lang}


MAKERS = {"get_weather": weather, "convert_currency": currency, "set_timer": timer, "search_flights": flights,
          "get_stock_price": stock, "translate_text": translate}


def result_and_answer(name: str, args: dict, rng) -> tuple[dict, str]:
    """A plausible tool result and the assistant's answer from it (made up: the rows teach the format)."""
    if name == "get_weather":
        unit = args.get("unit", "celsius")
        temp = rng.randint(-5, 32) if unit == "celsius" else rng.randint(23, 90)
        sky = rng.choice(["sunny", "cloudy", "rainy", "windy", "foggy"])
        deg = "°C" if unit == "celsius" else "°F"
        return ({"city": args["city"], "temperature": temp, "unit": unit, "condition": sky},
                f"It is {temp}{deg} and {sky} in {args['city']} right now.")
    if name == "convert_currency":
        value = round(args["amount"] * rng.uniform(0.5, 2.0), 2)
        return ({"amount": args["amount"], "from": args["from"], "to": args["to"], "result": value},
                f"{args['amount']} {args['from']} is about {value:.2f} {args['to']}.")
    if name == "set_timer":
        n = args["minutes"]
        return {"status": "started", "minutes": n}, f"Done: your {n}-minute timer is running."
    if name == "search_flights":
        flight, price = f"{rng.choice(['UA', 'AF', 'LH', 'BA', 'DL'])} {rng.randint(100, 999)}", rng.randint(80, 900)
        hour = f"{rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}"
        return ({"flights": [{"flight": flight, "departs": hour, "price_usd": price}]},
                f"I found {flight}, leaving {args['origin']} at {hour} on {args['date']} for ${price}.")
    if name == "get_stock_price":
        price = round(rng.uniform(20, 900), 2)
        return {"symbol": args["symbol"], "price": price, "currency": "USD"}, f"{args['symbol']} is at ${price:.2f}."
    return ({"text": args["text"], "target_language": args["target_language"], "status": "ok"},
            f"Here is the {args['target_language']} translation of \"{args['text']}\".")


def call_key(name: str, args: dict) -> str:
    return json.dumps([name, args], sort_keys=True)


def candidates(rng, name: str, n: int) -> list[tuple[str, str, dict]]:
    """n (request, name, arguments) for one tool, each request wording once."""
    seen, out = set(), []
    for _ in range(50 * n):
        text, args = MAKERS[name](rng)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append((text, name, args))
        if len(out) == n:
            break
    return out


def split_by_call(rows: list, sizes: dict, rng) -> dict:
    """{split: rows} of one tool; every call (function + arguments) lands in one split only."""
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(call_key(row[1], row[2]), []).append(row)
    keys = sorted(groups)
    rng.shuffle(keys)
    out, it = {}, iter(keys)
    for split, size in sizes.items():
        out[split] = []
        while len(out[split]) < size:
            out[split] += groups[next(it)]  # StopIteration: too few distinct calls for the sizes asked
        out[split] = out[split][:size]
    return out


def row(text: str, name: str, args: dict, rng, follow_up: bool) -> dict:
    others = rng.sample([t for t in sorted(TOOLS) if t != name], TOOLS_PER_ROW - 1)
    offered = [name] + others
    rng.shuffle(offered)
    call_id = f"call_{rng.randrange(16 ** 6):06x}"
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    if follow_up:
        result, answer = result_and_answer(name, args, rng)
        messages += [{"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(result)},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": [TOOLS[t] for t in offered]}


def main() -> None:
    rng = random.Random(SEED)
    per_tool = {split: -(-size // len(MAKERS)) for split, size in SPLITS.items()}  # rounded up, cut below
    splits = {split: [] for split in SPLITS}
    for name in sorted(MAKERS):
        pool = candidates(rng, name, 3 * sum(per_tool.values()))
        for split, rows in split_by_call(pool, per_tool, rng).items():
            splits[split] += rows
    OUT.mkdir(exist_ok=True)
    for split, rows in splits.items():
        rng.shuffle(rows)
        out = [row(text, name, args, rng, split != "test" and rng.random() < FOLLOW_UP)
               for text, name, args in rows[: SPLITS[split]]]
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
        follow = sum(len(r["messages"]) > 2 for r in out)
        print(f"{split}: {len(out)} rows ({follow} with a tool result and a final answer)")


if __name__ == "__main__":
    main()
