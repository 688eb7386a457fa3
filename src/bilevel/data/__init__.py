"""bilevel.data"""
