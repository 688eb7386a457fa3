"""bilevel.optim"""
