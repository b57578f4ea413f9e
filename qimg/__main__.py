from qimg.cli import run

run()
