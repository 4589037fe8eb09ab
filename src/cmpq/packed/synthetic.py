from cmpq.formats.synthetic import *  # noqa  TEMPORARY alias, removed before commit
from cmpq.formats.synthetic import mixed_widths, random_cmpq_layer  # noqa
