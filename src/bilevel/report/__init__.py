"""bilevel.report"""
