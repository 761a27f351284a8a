from carom_tracker.main import run

run()
