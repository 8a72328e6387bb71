"""python -m ivvae_cli"""

from ivvae_cli.cli import app

app(prog_name="ivvae")
