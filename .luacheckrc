std = "lua54"
max_line_length = 120
exclude_files = {"build*/**", "fuzz/corpus/**"}
files["spec/**/*_spec.lua"] = {std = "+busted"}
files["spec/helper.lua"] = {globals = {"lpar_helper"}}
