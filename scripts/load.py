#!/usr/bin/env python3
"""Drives a running tokenfleet (e.g. `scripts/demo.sh`) the way applications do, with the
official `openai` client: N concurrent clients for a bounded time (and a bounded request count),
a mix of streamed and plain chat completions, greedy and sampled, short and long prompts, and a
small batch through /v1/files + /v1/batches. Prints one JSON summary.

    python3 scripts/load.py --base-url http://127.0.0.1:8080/v1 --api-key KEY \
        --clients 8 --seconds 600

Exit status 1 when a request failed with anything but a retryable overload (429/503).
"""

import argparse
import io
import json
import random
import threading
import time

from openai import OpenAI, APIStatusError

SHORT = [
    "Explain why the sky is blue.",
    "Write a haiku about parking lots.",
    "What is a battery?",
    "Name three colors.",
    "Give me a tip for learning chess.",
]
LONG = (
    "Here are notes from a fleet operator's day. "
    + " ".join(
        f"At {h}:00 the depot had {10 + h} cars plugged in and {h % 5} leaving for deliveries."
        for h in range(6, 22)
    )
    + " Summarize the day in two sentences."
)


def client_loop(client, model, deadline, max_requests, counter, lock, stats, seed):
    rng = random.Random(seed)
    while time.time() < deadline:
        with lock:
            if counter[0] >= max_requests:
                return
            counter[0] += 1
            i = counter[0]
        prompt = LONG if rng.random() < 0.2 else rng.choice(SHORT)
        sampled = rng.random() < 0.5
        kwargs = dict(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=rng.choice([16, 48, 96]),
            temperature=0.8 if sampled else 0.0,
            seed=i,
        )
        started = time.time()
        try:
            if rng.random() < 0.5:
                text = ""
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
            else:
                r = client.chat.completions.create(**kwargs)
                text = r.choices[0].message.content or ""
            with lock:
                stats["ok"] += 1
                stats["latency_s"].append(time.time() - started)
        except APIStatusError as e:
            with lock:
                key = "overloaded" if e.status_code in (429, 503) else "failed"
                stats[key] += 1
                stats["errors"].append(f"{e.status_code}: {str(e)[:200]}")
        except Exception as e:  # network errors count as failures
            with lock:
                stats["failed"] += 1
                stats["errors"].append(str(e)[:200])


def run_batch(client, model, lines, timeout_s):
    body = "\n".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"One fact about the number {i}."}],
                    "max_tokens": 24,
                    "temperature": 0.0,
                },
            }
        )
        for i in range(lines)
    )
    f = client.files.create(file=("load.jsonl", io.BytesIO(body.encode())), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        b = client.batches.retrieve(b.id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(2)
    return {"status": b.status, "completed": b.request_counts.completed if b.request_counts else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--batch-lines", type=int, default=20)
    a = p.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=2, timeout=300)
    deadline = time.time() + a.seconds
    lock = threading.Lock()
    counter = [0]
    stats = {"ok": 0, "overloaded": 0, "failed": 0, "errors": [], "latency_s": []}
    threads = [
        threading.Thread(
            target=client_loop,
            args=(client, a.model, deadline, a.max_requests, counter, lock, stats, k),
        )
        for k in range(a.clients)
    ]
    for t in threads:
        t.start()
    batch = run_batch(client, a.model, a.batch_lines, a.seconds) if a.batch_lines else None
    for t in threads:
        t.join()
    lat = sorted(stats.pop("latency_s"))
    summary = {
        "requests": counter[0],
        **{k: v for k, v in stats.items() if k != "errors"},
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_max_s": lat[-1] if lat else None,
        "batch": batch,
        "first_errors": stats["errors"][:5],
    }
    print(json.dumps(summary, indent=2))
    raise SystemExit(1 if stats["failed"] else 0)


if __name__ == "__main__":
    main()
