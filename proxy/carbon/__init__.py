"""Energy to grams of CO2e: grid intensity, PUE, embodied hardware carbon (SCI)."""
