"""The export forms, one registered class per module (see :mod:`.base` for the contract).

>>> from qfv_brevitas.export.forms import FORMS, form_named
>>> FORMS
('compact', 'bitplanes', 'fixed', 'planes')
>>> form_named("planes").needs_fixed_point, form_named("compact").needs_fixed_point
(True, False)
"""
from qfv_brevitas.export.forms.base import (ExportForm, GraphView, form_named, form_names,
                                            register_form, unregister_form)
# importing a form's module registers it; the order here is the order users see
from qfv_brevitas.export.forms.compact import CompactForm
from qfv_brevitas.export.forms.bitplanes import BitPlanesForm
from qfv_brevitas.export.forms.fixed import FixedPointForm
from qfv_brevitas.export.forms.planes import PlanesForm

#: the forms built in to the library (:func:`form_names` also lists forms registered later)
FORMS = form_names()

__all__ = ["FORMS", "ExportForm", "GraphView", "form_named", "form_names", "register_form",
           "unregister_form", "CompactForm", "BitPlanesForm", "FixedPointForm", "PlanesForm"]
