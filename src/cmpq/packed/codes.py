from cmpq.formats.bitpack import *  # noqa  TEMPORARY alias, removed before commit
from cmpq.formats.bitpack import codes_at, unpack_codes, GROUP, padded_rows  # noqa
