"""python -m dist_dejpeg.config [--write docs/CONFIG.md]: print the config reference, or rewrite a page's."""

import sys

from dist_dejpeg.config.reference import reference_markdown, write_reference

if len(sys.argv) == 3 and sys.argv[1] == "--write":
    write_reference(sys.argv[2])
else:
    print(reference_markdown())
