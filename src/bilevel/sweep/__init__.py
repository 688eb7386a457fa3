"""bilevel.sweep"""
