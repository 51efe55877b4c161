# shellcheck shell=bash
# Sourced by scripts that fetch from the Debian archive this machine already
# uses (install-consul.sh, image.sh): no mirror of our own is hard-coded.

# One line per enabled `deb` source configured here, deb822 files first, then
# the one-line format: "main URI SUITES" or "security URI SUITES" (a -security
# suite).
apt_deb_sources() {
    local files=() f
    for f in /etc/apt/sources.list.d/*.sources; do [[ -r $f ]] && files+=("$f"); done
    ((${#files[@]} == 0)) || awk '
        function flush() {
            if (uri != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no")
                print (suites ~ /-security/ ? "security " : "main ") uri, suites
            uri = ""; types = ""; suites = ""; enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "types:"   { $1 = ""; types = $0 }
        tolower($1) == "uris:"    { uri = $2 }
        tolower($1) == "suites:"  { $1 = ""; suites = $0 }
        tolower($1) == "enabled:" { enabled = tolower($2) }
        END { flush() }
    ' "${files[@]}"
    # deb [options] URI suite components...
    [[ ! -r /etc/apt/sources.list ]] || awk '$1 == "deb" {
             i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
             print ($(i + 1) ~ /-security/ ? "security " : "main ") $i, $(i + 1)
         }' /etc/apt/sources.list
}
