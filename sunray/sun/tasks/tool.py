"""Tool calling: given a few tool schemas and a request, answer with one JSON function call
`{"name": ..., "arguments": {...}}`. Scored as: valid JSON, the right function, the right arguments (valid for the
schema, and equal to the reference: required ones and the optional ones the request asks for, nothing else)."""

from __future__ import annotations

import json
import random
from typing import Any

from sunray.sun.tasks.base import Example, GeneratedTask, pick

CITIES = (
    "Paris",
    "Seoul",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Toronto",
    "Cairo",
    "Lima",
    "Oslo",
    "Sydney",
    "Mumbai",
    "Rome",
)
CURRENCIES = ("USD", "EUR", "KRW", "JPY", "GBP", "CAD", "CHF", "AUD")
LANGUAGES = ("French", "German", "Korean", "Japanese", "Spanish", "Italian", "Portuguese")
ARTISTS = ("Miles Davis", "Taylor Swift", "Bach", "Daft Punk", "Nina Simone", "BTS", "Queen", "Adele")
RESTAURANTS = ("Luigi's", "Green Garden", "Sushi Ko", "The Oak Room", "Casa Blanca", "Blue Lotus")
STOCKS = ("AAPL", "NVDA", "MSFT", "GOOG", "AMZN", "TSLA", "META", "IBM")
PEOPLE = ("alice", "bob", "carol", "dan", "erin", "frank", "grace")
DOMAINS = ("example.com", "mail.org", "corp.net")
SUBJECTS = ("the quarterly report", "lunch on Friday", "the new design", "project kickoff", "travel plans")
PHRASES = (
    "good morning",
    "where is the station",
    "thank you very much",
    "the meeting starts at noon",
    "see you soon",
)
REMINDERS = ("call mom", "water the plants", "submit the form", "buy milk", "stretch", "check the oven")

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "description": "Get the current weather in a city",
        "parameters": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
    "convert_currency": {
        "description": "Convert an amount of money from one currency to another",
        "parameters": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"},
        },
        "required": ["amount", "from_currency", "to_currency"],
    },
    "set_alarm": {
        "description": "Set an alarm at a time of day (24-hour HH:MM)",
        "parameters": {"time": {"type": "string"}, "label": {"type": "string"}},
        "required": ["time"],
    },
    "send_email": {
        "description": "Send an email",
        "parameters": {"to": {"type": "string"}, "subject": {"type": "string"}},
        "required": ["to", "subject"],
    },
    "search_flights": {
        "description": "Search flights between two cities on a date (YYYY-MM-DD)",
        "parameters": {
            "origin": {"type": "string"},
            "destination": {"type": "string"},
            "date": {"type": "string"},
        },
        "required": ["origin", "destination", "date"],
    },
    "create_reminder": {
        "description": "Remind the user of something after a number of minutes",
        "parameters": {"text": {"type": "string"}, "minutes": {"type": "integer"}},
        "required": ["text", "minutes"],
    },
    "get_stock_price": {
        "description": "Get the latest price of a stock by its ticker symbol",
        "parameters": {"symbol": {"type": "string"}},
        "required": ["symbol"],
    },
    "translate_text": {
        "description": "Translate text into another language",
        "parameters": {"text": {"type": "string"}, "target_language": {"type": "string"}},
        "required": ["text", "target_language"],
    },
    "book_table": {
        "description": "Book a restaurant table",
        "parameters": {
            "restaurant": {"type": "string"},
            "people": {"type": "integer"},
            "time": {"type": "string"},
        },
        "required": ["restaurant", "people", "time"],
    },
    "play_music": {
        "description": "Play music by an artist",
        "parameters": {"artist": {"type": "string"}, "shuffle": {"type": "boolean"}},
        "required": ["artist"],
    },
}
_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,)}


def tool_schema(name: str) -> dict[str, Any]:
    spec = TOOLS[name]
    return {
        "name": name,
        "description": spec["description"],
        "parameters": spec["parameters"],
        "required": spec["required"],
    }


def _request(rng: random.Random, tool: str) -> tuple[str, dict[str, Any]]:
    """A natural-language request for `tool` and the arguments it implies."""
    if tool == "get_weather":
        city = pick(rng, CITIES)
        unit = pick(rng, (None, "celsius", "fahrenheit"))
        text = pick(rng, (f"What's the weather like in {city}?", f"How is the weather in {city} right now?"))
        if unit:
            text = text[:-1] + f", in {unit}?"
        return text, {"city": city, **({"unit": unit} if unit else {})}
    if tool == "convert_currency":
        amount = rng.randint(1, 2000) if rng.random() < 0.7 else round(rng.uniform(1, 500), 2)
        src, dst = rng.sample(CURRENCIES, 2)
        text = pick(rng, (f"How much is {amount} {src} in {dst}?", f"Convert {amount} {src} to {dst}."))
        return text, {"amount": amount, "from_currency": src, "to_currency": dst}
    if tool == "set_alarm":
        t = f"{rng.randint(0, 23):02d}:{pick(rng, (0, 15, 30, 45)):02d}"
        label = pick(rng, (None, "gym", "meeting", "medicine", "flight"))
        text = f"Set an alarm for {t}" + (f" labeled {label}." if label else ".")
        return text, {"time": t, **({"label": label} if label else {})}
    if tool == "send_email":
        to = f"{pick(rng, PEOPLE)}@{pick(rng, DOMAINS)}"
        subject = pick(rng, SUBJECTS)
        return f'Email {to} with the subject "{subject}".', {"to": to, "subject": subject}
    if tool == "search_flights":
        src, dst = rng.sample(CITIES, 2)
        date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        text = pick(
            rng,
            (f"Find flights from {src} to {dst} on {date}.", f"I need to fly from {src} to {dst} on {date}."),
        )
        return text, {"origin": src, "destination": dst, "date": date}
    if tool == "create_reminder":
        what, minutes = pick(rng, REMINDERS), rng.randint(1, 120)
        return f"Remind me to {what} in {minutes} minutes.", {"text": what, "minutes": minutes}
    if tool == "get_stock_price":
        sym = pick(rng, STOCKS)
        return pick(rng, (f"What is {sym} trading at?", f"Get me the stock price of {sym}.")), {"symbol": sym}
    if tool == "translate_text":
        phrase, lang = pick(rng, PHRASES), pick(rng, LANGUAGES)
        return f'Translate "{phrase}" into {lang}.', {"text": phrase, "target_language": lang}
    if tool == "book_table":
        place, people = pick(rng, RESTAURANTS), rng.randint(1, 10)
        t = f"{rng.randint(17, 22)}:{pick(rng, (0, 30)):02d}"
        return f"Book a table for {people} at {place} at {t}.", {
            "restaurant": place,
            "people": people,
            "time": t,
        }
    artist = pick(rng, ARTISTS)
    shuffle = pick(rng, (None, True))
    text = f"Play some {artist}" + (" on shuffle." if shuffle else ".")
    return text, {"artist": artist, **({"shuffle": True} if shuffle else {})}


def parse_call(completion: str) -> dict[str, Any] | None:
    """The first JSON object in a completion (markdown fences and text around it allowed); None if there is none."""
    text = completion.strip()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def check_call(call: dict[str, Any] | None, expected: dict[str, Any]) -> bool:
    """Valid against the schema, the right function, the right arguments."""
    if not call or set(call) != {"name", "arguments"} or not isinstance(call["arguments"], dict):
        return False
    name, args = call["name"], call["arguments"]
    if name != expected["name"] or name not in TOOLS:
        return False
    spec = TOOLS[name]
    if any(r not in args for r in spec["required"]) or any(k not in spec["parameters"] for k in args):
        return False
    for k, v in args.items():
        p = spec["parameters"][k]
        if not isinstance(v, _TYPES[p["type"]]) or (p["type"] != "boolean" and isinstance(v, bool)):
            return False
        if "enum" in p and v not in p["enum"]:
            return False
    return args == expected["arguments"]


class ToolTask(GeneratedTask):
    name = "tool"
    max_new_tokens = 64
    tools_per_prompt = 3

    def generate(self, rng: random.Random) -> Example:
        names = rng.sample(sorted(TOOLS), self.tools_per_prompt)
        target = pick(rng, names)
        request, args = _request(rng, target)
        schemas = "\n".join(json.dumps(tool_schema(n), separators=(",", ":")) for n in names)
        prompt = (
            f"You can call these tools:\n{schemas}\n"
            'Answer with one JSON function call {"name": ..., "arguments": {...}} and nothing else.\n'
            f"Request: {request}"
        )
        call = {"name": target, "arguments": args}
        return Example(prompt=prompt, response=json.dumps(call), answer=call)

    def score(self, example: Example, completion: str) -> bool:
        return check_call(parse_call(completion), example.answer)
