"""The reference workload: synthetic chat requests of mixed difficulty, as OpenAI batch JSONL.

    python -m spendwarden.devtools.workload [-o FILE] [--requests 3000] [--seed 7] [--days 3]

Deterministic: the same seed gives the same bytes. Each line is an OpenAI batch request
({"custom_id", "method", "url", "body"}) for the alias "chat", whose `metadata` (an OpenAI request
field of string values) carries what `spendwarden simulate` and bench/savings_bench.py need and a
batch file otherwise lacks:

    scenario       what kind of request (the table below)
    ts             arrival time (RFC 3339), over `days` days from START, busier in working hours
    output_tokens  how long a good answer is (never above the request's max_tokens)
    outcome        what an answer from a cheaper tier does: "ok", or the escalation cause it fails
                   with (length, invalid_json, refusal, upstream_error); drawn per scenario with the
                   probabilities below, which grow with how hard the scenario is for a small model

The mix is weighted towards what most production chat traffic is (short questions, classification,
extraction, summaries), with a minority of genuinely hard requests (code, multi-step reasoning,
tool-using agents with conversation history):

    scenario   share  temperature  cache?        cheap tier fails   answer tokens
    faq        36%    0            repeats       3%  refusal        40-160
    classify   14%    0, JSON      some repeats  5%  invalid_json   8-24
    extract    10%    0, JSON      no            8%  invalid_json   60-160
    summarize  14%    0.3          no            8%  length         120-300
    chat       12%    0.7          no            6%  refusal/length 150-400
    code        6%    0.2          no           35%  length/...     350-900
    reasoning   4%    0.2          no           45%  length/...     400-1000
    agent       4%    0, tools     no           25%  upstream/...   60-250
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

START = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
ALIAS = "chat"

PRODUCTS = ["the Pro plan", "the mobile app", "two-factor login", "the billing portal", "the API", "team seats",
            "the desktop client", "data export", "single sign-on", "the free trial", "invoices", "webhooks"]
FAQ_TEMPLATES = ["How do I cancel {p}?", "What does {p} cost per month?", "Can I get a refund for {p}?",
                 "How do I turn on {p}?", "Is {p} available in Europe?", "Where can I find {p} settings?",
                 "Why was I charged twice for {p}?", "How do I reset my password for {p}?",
                 "Does {p} work offline?", "Who can see my data in {p}?", "How do I contact support about {p}?",
                 "What changed in {p} this month?"]
ADJ = ["slow", "great", "confusing", "reliable", "expensive", "simple", "broken", "fast", "helpful", "clunky",
       "friendly", "buggy", "polished", "annoying", "solid"]
NOUNS = ["checkout", "dashboard", "support team", "update", "search", "onboarding", "export", "login", "pricing",
         "notifications", "sync", "report", "invoice", "calendar", "editor"]
WORDS = ("the a we our team customer order system report quarter revenue growth latency service region "
         "migration cost plan risk release feature user account data pipeline budget forecast vendor contract "
         "review meeting decision incident outage capacity storage network database cache queue deadline "
         "milestone roadmap hiring process policy compliance audit security access backup recovery").split()
FUNCS = ["parse a CSV file and sum a column", "merge overlapping intervals", "find the median of a stream",
         "validate an email address", "rate-limit calls per user", "retry a flaky HTTP call with backoff",
         "deduplicate records by key", "walk a directory tree and hash files", "an LRU cache",
         "topological sort of tasks", "parse ISO 8601 durations", "binary search on a rotated array"]
REASONING = ["Prove that the sum of the first n odd numbers is n squared, step by step.",
             "Compare and contrast optimistic and pessimistic locking; analyze the trade-offs for a busy "
             "inventory service and explain why one fails under contention.",
             "A train leaves at 9:40 at 84 km/h, another at 10:05 at 102 km/h on the same track. Calculate "
             "when the second catches up and think carefully about edge cases.",
             "Design an architecture for a multi-region rate limiter; evaluate the constraints and estimate "
             "the cost of each strategy.",
             "Derive the time complexity of this recursive algorithm and explain why the naive analysis is "
             "wrong: T(n) = 2T(n/2) + n log n.",
             "Critique this migration plan and find the root cause of the data loss it risks; reason about "
             "each multi-step phase."]
TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "refund", "description": "Refund an order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"},
                                                        "amount": {"type": "number"}}, "required": ["order_id"]}}}]
SYSTEM_SUPPORT = "You are a concise, friendly support assistant for Acme. Answer in at most three sentences."


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraphs(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(8, 18)) for _ in range(sentences))


FAQ_POOL_WEIGHTS = [1 / (k + 1) for k in range(len(FAQ_TEMPLATES) * len(PRODUCTS))]


def _faq(rng: random.Random) -> dict[str, Any]:
    # A Zipf pick (rank k with weight 1/(k+1)) from a fixed pool: popular questions repeat, which
    # makes cache hits at temperature 0.
    k = rng.choices(range(len(FAQ_POOL_WEIGHTS)), FAQ_POOL_WEIGHTS)[0]
    question = FAQ_TEMPLATES[k % len(FAQ_TEMPLATES)].format(p=PRODUCTS[(k * 7) % len(PRODUCTS)])
    return {"messages": [{"role": "system", "content": SYSTEM_SUPPORT}, {"role": "user", "content": question}],
            "temperature": 0, "max_tokens": 200}


def _classify(rng: random.Random) -> dict[str, Any]:
    # Reviews come from a pool, some classified again by a retrying pipeline.
    r = random.Random(rng.randint(0, 400))
    review = f"The {r.choice(NOUNS)} is {r.choice(ADJ)} and the {r.choice(NOUNS)} feels {r.choice(ADJ)}."
    return {"messages": [{"role": "system", "content": "Classify the sentiment of the review. Reply with JSON: "
                                                       "{\"sentiment\": \"positive|negative|mixed\", \"topic\": string}."},
                         {"role": "user", "content": review}],
            "temperature": 0, "max_tokens": 40, "response_format": {"type": "json_object"}}


def _extract(rng: random.Random) -> dict[str, Any]:
    body = (f"Hello, this is {rng.choice(['Ana', 'Ben', 'Chen', 'Dana', 'Eli'])} from "
            f"{rng.choice(['Globex', 'Initech', 'Umbrella', 'Hooli'])}. Order {rng.randint(10000, 99999)} "
            f"arrived on {rng.randint(1, 28)} March with {rng.randint(1, 9)} items missing. "
            + _paragraphs(rng, rng.randint(2, 5)) + f" Please refund {rng.randint(10, 900)}.{rng.randint(0, 99):02d} EUR.")
    return {"messages": [{"role": "system", "content": "Extract customer, company, order_id, missing_items and "
                                                       "refund_amount from the email as a JSON object."},
                         {"role": "user", "content": body}],
            "temperature": 0, "max_tokens": 200, "response_format": {"type": "json_object"}}


def _summarize(rng: random.Random) -> dict[str, Any]:
    doc = "\n\n".join(_paragraphs(rng, rng.randint(3, 6)) for _ in range(rng.randint(2, 4)))
    return {"messages": [{"role": "user", "content": "Summarize this meeting note in five bullet points:\n\n" + doc}],
            "temperature": 0.3, "max_tokens": 400}


def _chat(rng: random.Random) -> dict[str, Any]:
    topic = rng.choice(["a team offsite", "a product launch email", "a polite reminder to a vendor",
                        "a short bio", "release notes", "a job post for a support engineer", "a thank-you note"])
    return {"messages": [{"role": "user", "content": f"Write {topic} about {rng.choice(NOUNS)}. "
                                                      + _sentence(rng, rng.randint(6, 14))}],
            "temperature": 0.7, "max_tokens": 600}


def _code(rng: random.Random) -> dict[str, Any]:
    task = rng.choice(FUNCS)
    if rng.random() < 0.5:
        prompt = (f"Implement a Python function to {task}. Handle edge cases and explain the time complexity.")
    else:
        prompt = (f"Debug this function meant to {task}; it fails on some inputs:\n\n```python\n"
                  f"def solve(items):\n    out = []\n    for i in range(len(items)):\n"
                  f"        if items[i] > items[i + 1]:\n            out.append(items[i])\n    return out\n```\n\n"
                  f"Traceback (most recent call last):\n  File \"main.py\", line 4, in solve\nIndexError: list index out of range")
    return {"messages": [{"role": "user", "content": prompt}], "temperature": 0.2, "max_tokens": 1200}


def _reasoning(rng: random.Random) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": rng.choice(REASONING) + " " + _sentence(rng, 10)}],
            "temperature": 0.2, "max_tokens": 1500}


def _agent(rng: random.Random) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_SUPPORT + " Use the tools to act on orders."}]
    for turn in range(rng.randint(2, 4)):
        oid = str(rng.randint(10000, 99999))
        msgs.append({"role": "user", "content": f"Order {oid}: " + _sentence(rng, rng.randint(8, 16))})
        call = {"id": f"call_{turn}", "type": "function",
                "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": oid})}}
        msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{turn}",
                     "content": json.dumps({"status": rng.choice(["shipped", "lost", "delayed"]),
                                            "total": rng.randint(10, 500)})})
        msgs.append({"role": "assistant", "content": _sentence(rng, rng.randint(6, 12))})
    msgs.append({"role": "user", "content": "Please refund the lost ones and tell me the total."})
    return {"messages": msgs, "tools": TOOLS, "temperature": 0, "max_tokens": 500}


# scenario: (share, make body, answer tokens range, cheap-tier failure probability, causes)
SCENARIOS: dict[str, tuple[float, Callable[[random.Random], dict[str, Any]], tuple[int, int], float, tuple[str, ...]]] = {
    "faq": (0.36, _faq, (40, 160), 0.03, ("refusal",)),
    "classify": (0.14, _classify, (8, 24), 0.05, ("invalid_json",)),
    "extract": (0.10, _extract, (60, 160), 0.08, ("invalid_json",)),
    "summarize": (0.14, _summarize, (120, 300), 0.08, ("length",)),
    "chat": (0.12, _chat, (150, 400), 0.06, ("refusal", "length")),
    "code": (0.06, _code, (350, 900), 0.35, ("length", "refusal", "upstream_error")),
    "reasoning": (0.04, _reasoning, (400, 1000), 0.45, ("length", "refusal")),
    "agent": (0.04, _agent, (60, 250), 0.25, ("upstream_error", "refusal")),
}

# Relative traffic per UTC hour: quiet nights, busy working hours.
HOURLY = [1, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 9, 11, 12, 12, 10, 8, 6, 4, 3, 2, 2, 1]


def make(requests: int = 3000, seed: int = 7, days: int = 3, start: datetime = START) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][0] for n in names]
    times = sorted(start + timedelta(days=rng.randrange(days), hours=rng.choices(range(24), HOURLY)[0],
                                     seconds=rng.randrange(3600))
                   for _ in range(requests))
    out = []
    for i, ts in enumerate(times):
        name = rng.choices(names, weights)[0]
        _, make_body, (lo, hi), p_fail, causes = SCENARIOS[name]
        body = {"model": ALIAS, **make_body(rng)}
        answer = min(rng.randint(lo, hi), body["max_tokens"])
        outcome = rng.choice(causes) if rng.random() < p_fail else "ok"
        body["metadata"] = {"scenario": name, "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "output_tokens": str(answer), "outcome": outcome}
        out.append({"custom_id": f"req-{i:05d}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return out


def write(path: str, lines: list[dict[str, Any]]) -> int:
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    if path == "-":
        sys.stdout.buffer.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the reference workload (OpenAI batch JSONL).")
    p.add_argument("-o", "--output", default="-", help="File to write (default: stdout).")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=int, default=3)
    args = p.parse_args(argv)
    size = write(args.output, make(args.requests, args.seed, args.days))
    if args.output != "-":
        print(f"wrote {args.requests} requests, {size} bytes, to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
