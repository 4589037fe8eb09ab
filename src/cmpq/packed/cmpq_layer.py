from cmpq.formats.cmpq import *  # noqa  TEMPORARY alias, removed before commit
from cmpq.formats.cmpq import CMPQLinear, unpack_cmpq, pack_cmpq, use_tables  # noqa
