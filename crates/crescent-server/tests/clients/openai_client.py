"""Drive a crescent server with the official `openai` Python client.

Usage: openai_client.py BASE_URL IMAGE_DATA_URI_FILE API_KEY
Prints one JSON object with every result to stdout.
"""

import json
import sys

from openai import OpenAI

base, uri_file, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
with open(uri_file) as f:
    image_url = f.read().strip()
client = OpenAI(base_url=base, api_key=api_key)
out = {}

out["models"] = [m.id for m in client.models.list()]

user = [
    {"role": "system", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": image_url}},
        ],
    },
]
r = client.chat.completions.create(
    model="moondream3", messages=user, temperature=0, top_p=1, max_tokens=20
)
out["chat"] = {
    "content": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
    "object": r.object,
}

chunks, usage, finish, roles = [], None, None, []
stream = client.chat.completions.create(
    model="moondream3",
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "Describe the scene."},
    ]}],
    temperature=0,
    top_p=1,
    max_completion_tokens=20,
    stream=True,
    stream_options={"include_usage": True},
)
for ev in stream:
    if ev.usage is not None:
        usage = ev.usage.model_dump()
    for c in ev.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            chunks.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = {"chunks": chunks, "usage": usage, "finish_reason": finish, "roles": roles}

r = client.chat.completions.create(
    model="moondream3",
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "ball"},
    ]}],
    extra_body={"vllm_xargs": {"moondream3_task": "detect", "moondream3_max_objects": 3}},
)
out["detect"] = r.choices[0].message.content

r = client.chat.completions.create(
    model="moondream3",
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "cat"},
    ]}],
    extra_body={"vllm_xargs": {"moondream3_task": "point", "moondream3_max_objects": 2}},
)
out["point"] = r.choices[0].message.content

r = client.chat.completions.create(
    model="moondream3",
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "Where is the ball?"},
    ]}],
    temperature=0,
    top_p=1,
    max_tokens=20,
    extra_body={"reasoning": True},
)
msg = r.choices[0].message
out["reasoning"] = {
    "content": msg.content,
    "reasoning": getattr(msg, "reasoning", None) or (msg.model_extra or {}).get("reasoning"),
}

try:
    client.chat.completions.create(
        model="moondream3",
        messages=[{"role": "user", "content": "hi"}],
        temperature=-1,
    )
    out["bad_temperature"] = None
except Exception as e:  # openai.UnprocessableEntityError
    out["bad_temperature"] = {"type": type(e).__name__, "status": getattr(e, "status_code", None)}

print(json.dumps(out))
