"""mpkir.emitters"""
