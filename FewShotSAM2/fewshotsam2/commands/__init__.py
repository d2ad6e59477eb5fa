"""The command line's commands besides `segment` (cli.py): batch, batch on Ray, extent, refine."""
