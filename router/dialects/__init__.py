"""Inbound API shapes other than OpenAI chat (the gateway's internal form), one module of pure functions each:

- `anthropic_messages`: Anthropic Messages (`POST /v1/messages`, what Claude Code and the anthropic SDK send);
- `openai_responses`: OpenAI Responses (`POST /v1/responses`, what Codex and `client.responses` send).

Each converts a request to the internal chat form for the outbound providers (router/providers/), and the
chat completion or chat chunk stream that comes back into its own response or events. When the model's
provider speaks the dialect itself (anthropic/* on /v1/messages, openai/* on /v1/responses) the request
is passed through untouched instead (router/agents.py decides); the dialect then only reads the usage.
A field a new agent release adds is handled here, in one place: translated, or dropped with a debug log.
"""
