"""The official OpenAI client against the gateway of the quick start (``scripts/serve.sh``):

    .venv/bin/python examples/openai_client.py

lists the models, looks one up by its alias, and streams a chat answer from it.
"""

import openai

client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
print("models:", [model.id for model in client.models.list()])
print("'small' is", client.models.retrieve("small").id)
stream = client.chat.completions.create(
    model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
