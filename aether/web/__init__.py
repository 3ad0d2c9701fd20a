"""The built-in web chat page: plain HTML, CSS and JavaScript served from package data.

@.architecture
role: web page package
jobs: [package_metadata]
"""
