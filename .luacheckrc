std = "ngx_lua"
max_line_length = 80
exclude_files = { "target/**" }
files["spec/**/*_spec.lua"] = { std = "+busted" }
files["spec/**"] = { max_line_length = 100 }
files["bench/**"] = { max_line_length = 100 }
