"""A built-in offline corpus: a small probabilistic grammar over people, places and organisations.

Every person has a fixed home city and employer, so the text holds facts a masked LM can learn
("Ada Lovelace lives in Lyon ."), not just syntax. Deterministic in the seed.
"""

from __future__ import annotations

import numpy as np

FIRST = ("Ada Alan Grace Linus Marie Niels Emmy Kurt Rosalind Srinivasa Sofia Ibn Hedy Katherine Tim Barbara John "
         "Dorothy Claude Lise Edsger Frances Donald Margaret Richard Radia Yukihiro Guido Bjarne Anita").split()
LAST = ("Lovelace Turing Hopper Torvalds Curie Bohr Noether Godel Franklin Ramanujan Kovalevskaya Sina Lamarr Johnson "
        "Berners-Lee Liskov McCarthy Vaughan Shannon Meitner Dijkstra Allen Knuth Hamilton Stallman Perlman Matsumoto "
        "Rossum Stroustrup Borg").split()
CITIES = ("Paris Lyon Berlin Munich Madrid Lisbon Rome Milan Vienna Prague Warsaw Oslo Dublin London Leeds Boston "
          "Chicago Denver Austin Seattle Toronto Tokyo Osaka Seoul Delhi Lagos Nairobi Cairo Lima Quito").split()
COUNTRY_OF = {c: k for k, cs in {
    "France": "Paris Lyon", "Germany": "Berlin Munich", "Spain": "Madrid", "Portugal": "Lisbon",
    "Italy": "Rome Milan", "Austria": "Vienna", "Czechia": "Prague", "Poland": "Warsaw", "Norway": "Oslo",
    "Ireland": "Dublin", "England": "London Leeds", "America": "Boston Chicago Denver Austin Seattle",
    "Canada": "Toronto", "Japan": "Tokyo Osaka", "Korea": "Seoul", "India": "Delhi", "Nigeria": "Lagos",
    "Kenya": "Nairobi", "Egypt": "Cairo", "Peru": "Lima", "Ecuador": "Quito"}.items() for c in cs.split()}
ORGS = ("Acme Globex Initech Umbrella Hooli Vandelay Wonka Stark Wayne Tyrell Cyberdyne Soylent Monarch Oscorp "
        "Aperture").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
ITEMS = "book report letter paper map photo song poem model plan".split()


def _world(rng) -> dict:
    """The fixed facts: each person's home city and employer, each organisation's headquarters."""
    people = [{"name": f"{first} {LAST[i]}", "home": CITIES[int(rng.integers(len(CITIES)))],
               "org": ORGS[int(rng.integers(len(ORGS)))]} for i, first in enumerate(FIRST)]
    hq = {org: CITIES[int(rng.integers(len(CITIES)))] for org in ORGS}
    return {"people": people, "hq": hq}


def _sentence(rng, world) -> str:
    people, hq = world["people"], world["hq"]
    p = people[int(rng.integers(len(people)))]
    q = people[int(rng.integers(len(people)))]
    city = CITIES[int(rng.integers(len(CITIES)))]
    day, item = DAYS[int(rng.integers(7))], ITEMS[int(rng.integers(len(ITEMS)))]
    a, b = int(rng.integers(7)), int(rng.integers(6))
    templates = (
        f"{p['name']} lives in {p['home']} , a city in {COUNTRY_OF[p['home']]} .",
        f"{p['name']} works for {p['org']} , which is based in {hq[p['org']]} .",
        f"{city} is a city in {COUNTRY_OF[city]} .",
        f"On {day} {p['name']} travelled from {p['home']} to {city} in {COUNTRY_OF[city]} .",
        f"{p['name']} of {p['org']} sent a {item} to {q['name']} of {q['org']} .",
        f"{NUMBERS[a]} plus {NUMBERS[b]} makes {NUMBERS[a + b]} .",
        f"{q['name']} met {p['name']} , who lives in {p['home']} and works for {p['org']} .",
    )
    return templates[int(rng.integers(len(templates)))]


def synthetic_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """num_docs documents of 2-8 sentences each."""
    rng = np.random.default_rng(seed)
    world = _world(np.random.default_rng(1234))  # the facts stay fixed across seeds
    return [" ".join(_sentence(rng, world) for _ in range(int(rng.integers(2, 9)))) for _ in range(num_docs)]
