"""SAM2: the engine (each slice encoded once), checkpoints, the device, the memory and time budget."""
