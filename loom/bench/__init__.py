"""`loom bench`: a load generator for TGI- and OpenAI-compatible servers."""
