"""Drive a crescent server with the official `moondream` Python client.

Usage: moondream_client.py BASE_URL IMAGE_PATH API_KEY
Prints one JSON object with every result (and the data URI the client sent) to stdout.
"""

import json
import sys

import moondream as md
from PIL import Image

base, image_path, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
model = md.vl(endpoint=base, api_key=api_key)
image = Image.open(image_path)
# What the client sends for a PIL image (JPEG, quality 95): the test runs the engine on the
# same bytes.
image_url = model.encode_image(image).image_url

greedy = {"temperature": 0, "top_p": 1, "max_tokens": 24}
out = {"image_url": image_url}
out["caption"] = model.caption(image, length="short", settings=greedy)
out["caption_stream"] = list(
    model.caption(image, length="normal", stream=True, settings=greedy)["caption"]
)
out["query"] = model.query(image, "What is in the image?", settings=greedy)
out["query_stream"] = list(
    model.query(image, "Describe the scene.", stream=True, settings=greedy)["answer"]
)
out["query_reasoning"] = model.query(
    image, "Where is the ball?", reasoning=True, settings=greedy
)
out["query_text_only"] = model.query(question="Say hello.", settings=greedy)
out["detect"] = model.detect(image, "ball", settings={"max_objects": 3})
out["point"] = model.point(image, "cat", settings={"max_objects": 3})
out["point_refs"] = model.point(
    image, "cat", spatial_refs=[[0.25, 0.5], [0.1, 0.1, 0.6, 0.7]], settings={"max_objects": 2}
)
out["chat"] = model.chat(
    [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "What is this?"},
            ],
        },
    ],
    settings=greedy,
)
out["chat_stream"] = list(
    model.chat(
        [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}],
        stream=True,
        settings=greedy,
    )["message"]
)
print(json.dumps(out))
