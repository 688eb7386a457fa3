"""bilevel.recipes"""
