"""data/layouts"""
