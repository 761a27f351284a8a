from carom_recorder.main import run

run()
