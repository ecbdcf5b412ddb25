from stages import app

app()
