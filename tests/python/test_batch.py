"""The Batch API with the official `openai` client against a real fleet: upload a JSONL file,
create a batch, poll it to `completed`, read the output file: every custom_id answered exactly
once with a coherent chat completion."""

import io
import json
import time

from openai import OpenAI

from conftest import API_KEY, MODEL

N = 50
TOPICS = ["the moon", "bicycles", "rain", "volcanoes", "bread", "trains", "owls", "music", "glass", "rivers"]


def test_batch_answers_each_custom_id_exactly_once(fleet):
    client = OpenAI(base_url=fleet, api_key=API_KEY, max_retries=0, timeout=60)
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "max_tokens": 12,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
            },
        }
        for i in range(N)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    assert client.files.retrieve(uploaded.id).id == uploaded.id

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "pytest"},
    )
    assert batch.status == "validating"
    assert batch.metadata == {"purpose": "pytest"}

    deadline = time.time() + 600  # a hang guard, not a timing assertion
    lifecycle = ["validating", "in_progress", "finalizing", "completed"]
    seen_statuses = [batch.status]
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"batch stuck: {batch}"
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        seen_statuses.append(batch.status)
    assert batch.status == "completed", batch
    # Every status polled is a step of the lifecycle, in order, never back; the steps a poll
    # may have missed left their timestamps.
    assert all(s in lifecycle for s in seen_statuses), seen_statuses
    steps = [lifecycle.index(s) for s in seen_statuses]
    assert steps == sorted(steps), seen_statuses
    assert batch.in_progress_at is not None and batch.finalizing_at is not None, batch
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.request_counts.total == N
    assert batch.request_counts.completed == N
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at

    output = client.files.content(batch.output_file_id).text
    answers = [json.loads(line) for line in output.splitlines()]
    ids = [a["custom_id"] for a in answers]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(N))
    assert len(set(ids)) == N
    for a in answers:
        assert a["error"] is None
        assert a["response"]["status_code"] == 200
        body = a["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == MODEL
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] <= 12

    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
