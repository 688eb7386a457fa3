"""bilevel.models"""
