"""bilevel.meta"""
