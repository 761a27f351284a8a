from carom_simulator.main import run

run()
