"""HalkSpeech: a self-hosted speech-to-text server for OpenAI Whisper models."""

__version__ = "0.1.0"
