"""The one way from labeled supports and a structure selection to typed supports."""
