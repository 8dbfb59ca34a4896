"""mpkir.runtime"""
