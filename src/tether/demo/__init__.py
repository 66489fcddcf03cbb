"""The demo application (web, books, greeter, traffic) and the demo run on a local mesh."""
