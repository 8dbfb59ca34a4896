"""mpkir.passes"""
