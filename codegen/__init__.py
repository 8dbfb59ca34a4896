"""mpkir.codegen"""
