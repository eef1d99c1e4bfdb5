"""Avalanche adapters: condensed rehearsal buffers and the plugin that replays them."""
