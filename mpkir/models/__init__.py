"""mpkir.models"""
