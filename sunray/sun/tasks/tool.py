"""Tool calling: given a few tool schemas and a request, answer with one JSON function call
`{"name": ..., "arguments": {...}}`. Scored as: valid JSON, the right function, the right arguments (valid for the
schema, and equal to the reference: required ones and the optional ones the request asks for, nothing else).

Thirty tools; test and val have their own (`TOOL_SPLITS`), so a test request is for a tool, with a schema and
parameter names, that no training example shows: the model has to read the schema and map the request onto its
parameters (`departure_city`, `travel_date`, ...). Requests say some values the way people do, and the schema wants
them otherwise: dates as "March 14, 2026" for YYYY-MM-DD, times as "7:30 pm" for HH:MM, small counts as words
("for two people"); training teaches these conversions on other tools.

Split keys (`Example.keys`), none of which a test example shares with train:
- `tool`: the function to call (every tool listed in the prompt is of the same split);
- `template`: the phrasing of the request (each tool has its own);
- `tools`: the set of tools the prompt lists.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
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
LABELS = ("gym", "meeting", "medicine", "flight", "tea", "laundry")
TOPPINGS = ("pepperoni", "mushroom", "cheese", "veggie", "ham")
EVENTS = ("team lunch", "dentist visit", "book club", "yoga class", "board meeting")
ROOMS = ("bedroom", "kitchen", "office", "living room")
MESSAGES = ("running late", "call me back", "happy birthday", "see you at six", "on my way")
INGREDIENTS = ("chicken", "tofu", "lentils", "salmon", "spinach", "rice")
SHOWS = ("The Daily", "Radiolab", "Serial", "Hard Fork", "Planet Money")
TOPICS = ("technology", "sports", "science", "politics", "climate")
MOVIES = ("Dune", "Inside Out", "Oppenheimer", "Barbie", "Up")
GROCERIES = ("bananas", "eggs", "lemons", "onions", "tomatoes", "avocados")
UNITS = ("miles", "kilometers", "pounds", "kilograms", "feet", "meters", "liters", "gallons")
DOCTORS = ("Dr. Kim", "Dr. Patel", "Dr. Garcia", "Dr. Okafor", "Dr. Rossi")
DEVICES = ("kitchen speaker", "tv", "headphones", "car stereo")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

Value = Callable[[random.Random], tuple[Any, str]]  # (the argument, how the request says it)


def choice(items: tuple[str, ...]) -> Value:
    return lambda r: (v := pick(r, items), v)


def integer(lo: int, hi: int, words: bool = False) -> Value:
    def draw(r: random.Random) -> tuple[int, str]:
        v = r.randint(lo, hi)
        return v, NUMBER_WORDS[v] if words and v < len(NUMBER_WORDS) and r.random() < 0.5 else str(v)

    return draw


def amount(r: random.Random) -> tuple[float | int, str]:
    v = r.randint(1, 2000) if r.random() < 0.7 else round(r.uniform(1, 500), 2)
    return v, str(v)


def date(r: random.Random) -> tuple[str, str]:
    m, d = r.randint(1, 12), r.randint(1, 28)
    iso = f"2026-{m:02d}-{d:02d}"
    return iso, iso if r.random() < 0.5 else f"{MONTHS[m - 1]} {d}, 2026"


def clock(r: random.Random) -> tuple[str, str]:
    h, m = r.randint(6, 22), pick(r, (0, 15, 30, 45))
    hhmm = f"{h:02d}:{m:02d}"
    if r.random() < 0.5:
        return hhmm, hhmm
    h12 = h - 12 if h > 12 else h
    return hhmm, f"{h12}{f':{m:02d}' if m else ''} {'pm' if h >= 12 else 'am'}"


def email(r: random.Random) -> tuple[str, str]:
    v = f"{pick(r, PEOPLE)}@{pick(r, DOMAINS)}"
    return v, v


def phone(r: random.Random) -> tuple[str, str]:
    v = f"555-{r.randint(0, 9999):04d}"
    return v, v


def tracking(r: random.Random) -> tuple[str, str]:
    v = f"1Z{r.randint(0, 999999):06d}"
    return v, v


def true(r: random.Random) -> tuple[bool, str]:
    return True, ""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str  # string, integer, number, boolean
    value: Value
    required: bool = True
    enum: tuple[str, ...] | None = None
    format: str | None = None  # shown in the schema: YYYY-MM-DD, HH:MM


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: tuple[Param, ...]
    # Request phrasings: {param} is replaced by how the request says the value; [param|text] is there only when
    # the optional param is given.
    requests: tuple[str, ...]


def P(name: str, value: Value, type: str = "string", **kw: Any) -> Param:
    return Param(name, type, value, **kw)


def _opt(name: str, value: Value, type: str = "string", **kw: Any) -> Param:
    return Param(name, type, value, required=False, **kw)


DATE = {"format": "YYYY-MM-DD"}
TIME = {"format": "HH:MM"}
ALL_TOOLS: tuple[Tool, ...] = (
    # -- train --
    Tool(
        "get_weather",
        "Get the current weather in a city",
        (
            P("city", choice(CITIES)),
            _opt("unit", choice(("celsius", "fahrenheit")), enum=("celsius", "fahrenheit")),
        ),
        (
            "What's the weather like in {city}[unit|, in {unit}]?",
            "How is the weather in {city} right now[unit| (in {unit})]?",
        ),
    ),
    Tool(
        "convert_currency",
        "Convert an amount of money from one currency to another",
        (
            P("amount", amount, "number"),
            P("from_currency", choice(CURRENCIES)),
            P("to_currency", choice(CURRENCIES)),
        ),
        (
            "How much is {amount} {from_currency} in {to_currency}?",
            "Convert {amount} {from_currency} to {to_currency}.",
        ),
    ),
    Tool(
        "set_alarm",
        "Set an alarm at a time of day",
        (P("time", clock, **TIME), _opt("label", choice(LABELS))),
        (
            "Set an alarm for {time}[label| labeled {label}].",
            "Wake me up at {time}[label| with the label {label}].",
        ),
    ),
    Tool(
        "send_email",
        "Send an email",
        (P("to", email), P("subject", choice(SUBJECTS))),
        ('Email {to} with the subject "{subject}".', 'Send an email to {to} about "{subject}".'),
    ),
    Tool(
        "search_flights",
        "Search flights between two cities on a date",
        (P("origin", choice(CITIES)), P("destination", choice(CITIES)), P("date", date, **DATE)),
        (
            "Find flights from {origin} to {destination} on {date}.",
            "I need to fly from {origin} to {destination} on {date}.",
        ),
    ),
    Tool(
        "create_reminder",
        "Remind the user of something after a number of minutes",
        (P("text", choice(REMINDERS)), P("minutes", integer(1, 120), "integer")),
        ("Remind me to {text} in {minutes} minutes.", "In {minutes} minutes, remind me to {text}."),
    ),
    Tool(
        "get_stock_price",
        "Get the latest price of a stock by its ticker symbol",
        (P("symbol", choice(STOCKS)),),
        ("What is {symbol} trading at?", "Get me the stock price of {symbol}."),
    ),
    Tool(
        "translate_text",
        "Translate text into another language",
        (P("text", choice(PHRASES)), P("target_language", choice(LANGUAGES))),
        ('Translate "{text}" into {target_language}.', 'How do you say "{text}" in {target_language}?'),
    ),
    Tool(
        "book_table",
        "Book a restaurant table",
        (
            P("restaurant", choice(RESTAURANTS)),
            P("people", integer(1, 10, words=True), "integer"),
            P("time", clock, **TIME),
        ),
        (
            "Book a table for {people} at {restaurant} at {time}.",
            "Reserve {restaurant} for {people} people at {time}.",
        ),
    ),
    Tool(
        "play_music",
        "Play music by an artist",
        (P("artist", choice(ARTISTS)), _opt("shuffle", true, "boolean")),
        ("Play some {artist}[shuffle| on shuffle].", "Put on {artist}[shuffle|, shuffled]."),
    ),
    Tool(
        "order_pizza",
        "Order pizzas for delivery",
        (
            P("size", choice(("small", "medium", "large")), enum=("small", "medium", "large")),
            P("topping", choice(TOPPINGS)),
            P("quantity", integer(1, 6, words=True), "integer"),
        ),
        ("Order {quantity} {size} {topping} pizzas.", "I'd like {quantity} {size} pizzas with {topping}."),
    ),
    Tool(
        "get_directions",
        "Get directions from one place to another",
        (
            P("start", choice(CITIES)),
            P("end", choice(CITIES)),
            _opt("mode", choice(("driving", "walking", "transit")), enum=("driving", "walking", "transit")),
        ),
        (
            "How do I get from {start} to {end}[mode| by {mode}]?",
            "Show me the way from {start} to {end}[mode|, {mode}].",
        ),
    ),
    Tool(
        "add_calendar_event",
        "Add an event to the calendar",
        (P("title", choice(EVENTS)), P("date", date, **DATE), _opt("time", clock, **TIME)),
        (
            "Add {title} to my calendar on {date}[time| at {time}].",
            "Put {title} in my calendar for {date}[time| at {time}].",
        ),
    ),
    Tool(
        "set_thermostat",
        "Set the thermostat to a temperature in degrees",
        (P("temperature", integer(16, 28), "integer"), _opt("room", choice(ROOMS))),
        (
            "Set the thermostat to {temperature} degrees[room| in the {room}].",
            "Make it {temperature} degrees[room| in the {room}].",
        ),
    ),
    Tool(
        "send_text_message",
        "Send a text message to a phone number",
        (P("phone_number", phone), P("message", choice(MESSAGES))),
        ('Text {phone_number}: "{message}".', 'Send "{message}" to {phone_number}.'),
    ),
    Tool(
        "search_recipes",
        "Search recipes by ingredient",
        (P("ingredient", choice(INGREDIENTS)), _opt("max_minutes", integer(10, 90), "integer")),
        (
            "Find recipes with {ingredient}[max_minutes| that take at most {max_minutes} minutes].",
            "What can I cook with {ingredient}[max_minutes| in {max_minutes} minutes or less]?",
        ),
    ),
    Tool(
        "rent_car",
        "Rent a car in a city",
        (
            P("city", choice(CITIES)),
            P("pickup_date", date, **DATE),
            P("days", integer(1, 12, words=True), "integer"),
        ),
        (
            "Rent a car in {city} from {pickup_date} for {days} days.",
            "I need a rental car in {city} for {days} days starting {pickup_date}.",
        ),
    ),
    Tool(
        "check_package_status",
        "Check the delivery status of a package",
        (P("tracking_number", tracking),),
        ("Where is my package {tracking_number}?", "Track the parcel with number {tracking_number}."),
    ),
    Tool(
        "play_podcast",
        "Play a podcast",
        (P("show", choice(SHOWS)), _opt("episode", integer(1, 200), "integer")),
        (
            "Play {show}[episode|, episode {episode}].",
            "Start the podcast {show}[episode| from episode {episode}].",
        ),
    ),
    # -- val --
    Tool(
        "book_hotel",
        "Book a hotel room",
        (
            P("city", choice(CITIES)),
            P("check_in", date, **DATE),
            P("nights", integer(1, 10, words=True), "integer"),
        ),
        (
            "Book a hotel in {city} for {nights} nights from {check_in}.",
            "I need a room in {city} from {check_in}, {nights} nights.",
        ),
    ),
    Tool(
        "get_news",
        "Get the latest news headlines on a topic",
        (P("topic", choice(TOPICS)), _opt("count", integer(1, 10), "integer")),
        (
            "Give me [count|{count} ]headlines about {topic}.",
            "What's the news on {topic}[count|? Just {count} stories]?",
        ),
    ),
    Tool(
        "start_timer",
        "Start a countdown timer",
        (P("minutes", integer(1, 90), "integer"), _opt("label", choice(LABELS))),
        (
            "Start a timer for {minutes} minutes[label| called {label}].",
            "Count down {minutes} minutes[label| for {label}].",
        ),
    ),
    Tool(
        "find_movie_showtimes",
        "Find when a movie is playing in a city",
        (P("movie", choice(MOVIES)), P("city", choice(CITIES)), _opt("date", date, **DATE)),
        (
            "When is {movie} playing in {city}[date| on {date}]?",
            "Showtimes for {movie} in {city}[date| on {date}], please.",
        ),
    ),
    # -- test --
    Tool(
        "reserve_train_ticket",
        "Reserve a train ticket",
        (
            P("departure_city", choice(CITIES)),
            P("arrival_city", choice(CITIES)),
            P("travel_date", date, **DATE),
            _opt("passengers", integer(1, 6, words=True), "integer"),
        ),
        (
            "Get me a train ticket from {departure_city} to {arrival_city} on {travel_date}[passengers| for {passengers} passengers].",
            "Book the train from {departure_city} to {arrival_city} for {travel_date}[passengers|, {passengers} people].",
        ),
    ),
    Tool(
        "get_air_quality",
        "Get the air quality forecast for a city",
        (P("city", choice(CITIES)), _opt("days", integer(1, 7), "integer")),
        (
            "How clean is the air in {city}[days| over the next {days} days]?",
            "Check the air quality in {city}[days| for {days} days].",
        ),
    ),
    Tool(
        "schedule_meeting",
        "Schedule a meeting with someone",
        (
            P("attendee", email),
            P("date", date, **DATE),
            P("start_time", clock, **TIME),
            P("duration_minutes", integer(15, 90), "integer"),
        ),
        (
            "Schedule a {duration_minutes}-minute meeting with {attendee} on {date} at {start_time}.",
            "Set up a meeting with {attendee} on {date} at {start_time} for {duration_minutes} minutes.",
        ),
    ),
    Tool(
        "order_groceries",
        "Order groceries for delivery",
        (
            P("item", choice(GROCERIES)),
            P("quantity", integer(1, 12, words=True), "integer"),
            _opt("express", true, "boolean"),
        ),
        (
            "Order {quantity} {item}[express| with express delivery].",
            "Buy {quantity} {item} for me[express|, express shipping please].",
        ),
    ),
    Tool(
        "convert_units",
        "Convert a value from one unit to another",
        (P("value", amount, "number"), P("from_unit", choice(UNITS)), P("to_unit", choice(UNITS))),
        ("Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"),
    ),
    Tool(
        "book_doctor_appointment",
        "Book an appointment with a doctor",
        (P("doctor", choice(DOCTORS)), P("date", date, **DATE), P("time", clock, **TIME)),
        (
            "Book an appointment with {doctor} on {date} at {time}.",
            "I want to see {doctor} at {time} on {date}.",
        ),
    ),
    Tool(
        "set_volume",
        "Set the volume of a device from 0 to 100",
        (P("level", integer(0, 100), "integer"), _opt("device", choice(DEVICES))),
        (
            "Set the volume to {level}[device| on the {device}].",
            "Turn the[device| {device}] volume to {level}.",
        ),
    ),
)
_BY_NAME = {t.name: t for t in ALL_TOOLS}
TOOL_SPLITS = {
    "val": ("book_hotel", "get_news", "start_timer", "find_movie_showtimes"),
    "test": (
        "reserve_train_ticket",
        "get_air_quality",
        "schedule_meeting",
        "order_groceries",
        "convert_units",
        "book_doctor_appointment",
        "set_volume",
    ),
}
TOOL_SPLITS["train"] = tuple(
    t.name for t in ALL_TOOLS if t.name not in TOOL_SPLITS["val"] + TOOL_SPLITS["test"]
)


def _spec(tool: Tool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for p in tool.params:
        d: dict[str, Any] = {"type": p.type}
        if p.enum:
            d["enum"] = list(p.enum)
        if p.format:
            d["format"] = p.format
        params[p.name] = d
    return {
        "description": tool.description,
        "parameters": params,
        "required": [p.name for p in tool.params if p.required],
    }


TOOLS: dict[str, dict[str, Any]] = {t.name: _spec(t) for t in ALL_TOOLS}
_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,)}
_OPTIONAL = re.compile(r"\[(\w+)\|([^\]]*)\]")


def tool_schema(name: str) -> dict[str, Any]:
    return {"name": name, **TOOLS[name]}


def _request(rng: random.Random, tool: Tool) -> tuple[int, str, dict[str, Any]]:
    """(which phrasing, a natural-language request for `tool`, the arguments it implies)."""
    i = rng.randrange(len(tool.requests))
    while True:
        args: dict[str, Any] = {}
        said: dict[str, str] = {}
        for p in tool.params:
            if p.required or rng.random() < 0.5:
                args[p.name], said[p.name] = p.value(rng)
        strings = [v for v in args.values() if isinstance(v, str)]
        if len(set(strings)) == len(strings):  # origin != destination, from != to, ...
            break
    text = _OPTIONAL.sub(lambda m: m.group(2) if m.group(1) in args else "", tool.requests[i])
    return i, text.format(**said), args


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
    max_new_tokens = 80
    tools_per_prompt = 3
    split_keys = ("tool", "template", "tools")

    def generate(self, rng: random.Random, split: str) -> Example:
        names = rng.sample(sorted(TOOL_SPLITS[split]), self.tools_per_prompt)
        target = pick(rng, names)
        i, request, args = _request(rng, _BY_NAME[target])
        schemas = "\n".join(json.dumps(tool_schema(n), separators=(",", ":")) for n in names)
        prompt = (
            f"You can call these tools:\n{schemas}\n"
            'Answer with one JSON function call {"name": ..., "arguments": {...}} and nothing else.\n'
            f"Request: {request}"
        )
        call = {"name": target, "arguments": args}
        keys = {"tool": target, "template": f"{target}/{i}", "tools": ",".join(sorted(names))}
        return Example(prompt=prompt, response=json.dumps(call), answer=call, keys=keys)

    def score(self, example: Example, completion: str) -> bool:
        return check_call(parse_call(completion), example.answer)
