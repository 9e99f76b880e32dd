"""The CBorg example that asks every model the same question (https://cborg.lbl.gov/api_examples).

    CBORG_API_KEY=sk-... CBORG_BASE_URL=http://127.0.0.1:8000 python examples/every_model.py

Models that cannot answer (no provider credentials on this gateway, not served here, an
embedding model) print a short error instead of an answer.
"""
import os

import openai

client = openai.OpenAI(api_key=os.environ.get("CBORG_API_KEY"),
                       base_url=os.environ.get("CBORG_BASE_URL", "https://api.cborg.lbl.gov"))

for model in [m.id for m in client.models.list().data]:
    try:
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            temperature=0.0,
        )
        print(f"Model: {model}\nResponse: {response.choices[-1].message.content!r}\n")
    except openai.APIStatusError as e:
        print(f"Model: {model}\nError {e.status_code}: {e.body['message'] if isinstance(e.body, dict) else e}\n")
