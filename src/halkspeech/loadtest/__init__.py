"""Load testers that drive a running HalkSpeech server like real clients (HTTP uploads, WebSocket turns)."""
