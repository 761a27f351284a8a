from carom_router.main import run

run()
