"""What users run: chat, the OpenAI-compatible server and its dashboard, simulated conversations, drift."""
