"""mpkir.commands"""
