"""bilevel.hypergrad"""
