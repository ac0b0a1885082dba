"""Built-in English -> German / French corpus, used when no system gettext catalogues exist.

A few hundred short everyday sentences: a hand-written list of phrases plus simple
subject-verb-object sentences built from small conjugation tables (every combination is
grammatical in all three languages). Small on purpose: it lets the quickstart and the tests run
on a machine without `/usr/share/locale`, not train a useful translator.
"""

from __future__ import annotations

FALLBACK_LANGS = ("de", "fr")

# (English, German, French)
_PHRASES = (
    ("Hello.", "Hallo.", "Bonjour."),
    ("Good morning.", "Guten Morgen.", "Bonjour."),
    ("Good evening.", "Guten Abend.", "Bonsoir."),
    ("Good night.", "Gute Nacht.", "Bonne nuit."),
    ("Goodbye.", "Auf Wiedersehen.", "Au revoir."),
    ("See you tomorrow.", "Bis morgen.", "À demain."),
    ("Thank you.", "Danke.", "Merci."),
    ("Thank you very much.", "Vielen Dank.", "Merci beaucoup."),
    ("You are welcome.", "Gern geschehen.", "De rien."),
    ("Please.", "Bitte.", "S'il vous plaît."),
    ("Excuse me.", "Entschuldigung.", "Excusez-moi."),
    ("I am sorry.", "Es tut mir leid.", "Je suis désolé."),
    ("Yes.", "Ja.", "Oui."),
    ("No.", "Nein.", "Non."),
    ("Maybe.", "Vielleicht.", "Peut-être."),
    ("How are you?", "Wie geht es dir?", "Comment vas-tu ?"),
    ("I am fine.", "Mir geht es gut.", "Je vais bien."),
    ("What is your name?", "Wie heißt du?", "Comment t'appelles-tu ?"),
    ("My name is Anna.", "Ich heiße Anna.", "Je m'appelle Anna."),
    ("Nice to meet you.", "Freut mich.", "Enchanté."),
    ("Where are you from?", "Woher kommst du?", "D'où viens-tu ?"),
    ("I am from Berlin.", "Ich komme aus Berlin.", "Je viens de Berlin."),
    ("Do you speak English?", "Sprichst du Englisch?", "Parles-tu anglais ?"),
    ("I do not understand.", "Ich verstehe nicht.", "Je ne comprends pas."),
    ("Please speak slowly.", "Bitte sprich langsam.", "Parle lentement, s'il te plaît."),
    ("Can you help me?", "Kannst du mir helfen?", "Peux-tu m'aider ?"),
    ("Where is the station?", "Wo ist der Bahnhof?", "Où est la gare ?"),
    ("Where is the toilet?", "Wo ist die Toilette?", "Où sont les toilettes ?"),
    ("How much is this?", "Wie viel kostet das?", "Combien ça coûte ?"),
    ("That is too expensive.", "Das ist zu teuer.", "C'est trop cher."),
    ("What time is it?", "Wie spät ist es?", "Quelle heure est-il ?"),
    ("It is late.", "Es ist spät.", "Il est tard."),
    ("It is early.", "Es ist früh.", "Il est tôt."),
    ("The weather is nice today.", "Das Wetter ist heute schön.", "Il fait beau aujourd'hui."),
    ("It is raining.", "Es regnet.", "Il pleut."),
    ("It is snowing.", "Es schneit.", "Il neige."),
    ("It is cold.", "Es ist kalt.", "Il fait froid."),
    ("It is warm.", "Es ist warm.", "Il fait chaud."),
    ("I am hungry.", "Ich habe Hunger.", "J'ai faim."),
    ("I am thirsty.", "Ich habe Durst.", "J'ai soif."),
    ("I am tired.", "Ich bin müde.", "Je suis fatigué."),
    ("I am happy.", "Ich bin glücklich.", "Je suis heureux."),
    ("I am ready.", "Ich bin bereit.", "Je suis prêt."),
    ("I would like a coffee.", "Ich möchte einen Kaffee.", "Je voudrais un café."),
    ("I would like a tea.", "Ich möchte einen Tee.", "Je voudrais un thé."),
    ("A glass of water, please.", "Ein Glas Wasser, bitte.", "Un verre d'eau, s'il vous plaît."),
    ("The bill, please.", "Die Rechnung, bitte.", "L'addition, s'il vous plaît."),
    ("The food is good.", "Das Essen ist gut.", "La nourriture est bonne."),
    ("I like music.", "Ich mag Musik.", "J'aime la musique."),
    ("I like to read.", "Ich lese gern.", "J'aime lire."),
    (
        "I live in a small town.",
        "Ich wohne in einer kleinen Stadt.",
        "J'habite dans une petite ville.",
    ),
    ("I work in an office.", "Ich arbeite in einem Büro.", "Je travaille dans un bureau."),
    ("I go to school.", "Ich gehe zur Schule.", "Je vais à l'école."),
    ("I am going home.", "Ich gehe nach Hause.", "Je rentre à la maison."),
    ("The door is open.", "Die Tür ist offen.", "La porte est ouverte."),
    ("The door is closed.", "Die Tür ist geschlossen.", "La porte est fermée."),
    ("The shop is closed.", "Der Laden ist geschlossen.", "Le magasin est fermé."),
    ("The train is late.", "Der Zug hat Verspätung.", "Le train est en retard."),
    ("The bus is coming.", "Der Bus kommt.", "Le bus arrive."),
    ("Open the window, please.", "Öffne bitte das Fenster.", "Ouvre la fenêtre, s'il te plaît."),
    ("Close the door, please.", "Schließ bitte die Tür.", "Ferme la porte, s'il te plaît."),
    ("Wait a moment.", "Warte einen Moment.", "Attends un moment."),
    ("Come here.", "Komm her.", "Viens ici."),
    ("Sit down, please.", "Setz dich bitte.", "Assieds-toi, s'il te plaît."),
    ("Have a nice day.", "Einen schönen Tag noch.", "Bonne journée."),
    ("Happy birthday!", "Alles Gute zum Geburtstag!", "Joyeux anniversaire !"),
    ("Good luck!", "Viel Glück!", "Bonne chance !"),
    ("Enjoy your meal.", "Guten Appetit.", "Bon appétit."),
    ("Today is Monday.", "Heute ist Montag.", "Aujourd'hui, c'est lundi."),
    ("Tomorrow is Sunday.", "Morgen ist Sonntag.", "Demain, c'est dimanche."),
    ("I have two brothers.", "Ich habe zwei Brüder.", "J'ai deux frères."),
    ("I have a sister.", "Ich habe eine Schwester.", "J'ai une sœur."),
    ("My mother is a doctor.", "Meine Mutter ist Ärztin.", "Ma mère est médecin."),
    ("My father is a teacher.", "Mein Vater ist Lehrer.", "Mon père est professeur."),
    ("The children are playing.", "Die Kinder spielen.", "Les enfants jouent."),
    ("The dog is sleeping.", "Der Hund schläft.", "Le chien dort."),
    ("The cat is black.", "Die Katze ist schwarz.", "Le chat est noir."),
    ("The sky is blue.", "Der Himmel ist blau.", "Le ciel est bleu."),
    ("The grass is green.", "Das Gras ist grün.", "L'herbe est verte."),
    ("The house is big.", "Das Haus ist groß.", "La maison est grande."),
    ("The room is small.", "Das Zimmer ist klein.", "La chambre est petite."),
    ("The water is cold.", "Das Wasser ist kalt.", "L'eau est froide."),
    ("The soup is hot.", "Die Suppe ist heiß.", "La soupe est chaude."),
    ("This book is interesting.", "Dieses Buch ist interessant.", "Ce livre est intéressant."),
    ("This is my friend.", "Das ist mein Freund.", "C'est mon ami."),
    ("Where do you live?", "Wo wohnst du?", "Où habites-tu ?"),
    ("What are you doing?", "Was machst du?", "Que fais-tu ?"),
    ("I am learning German.", "Ich lerne Deutsch.", "J'apprends l'allemand."),
    ("I am learning French.", "Ich lerne Französisch.", "J'apprends le français."),
    ("Save the file.", "Speichere die Datei.", "Enregistre le fichier."),
    ("Open the file.", "Öffne die Datei.", "Ouvre le fichier."),
    ("The file was not found.", "Die Datei wurde nicht gefunden.", "Le fichier est introuvable."),
    ("Do you want to continue?", "Möchtest du fortfahren?", "Veux-tu continuer ?"),
    ("Are you sure?", "Bist du sicher?", "Es-tu sûr ?"),
    ("Cancel", "Abbrechen", "Annuler"),
    ("Help", "Hilfe", "Aide"),
    ("Settings", "Einstellungen", "Paramètres"),
    ("Search", "Suchen", "Rechercher"),
    ("Print", "Drucken", "Imprimer"),
    ("Delete", "Löschen", "Supprimer"),
    ("Close", "Schließen", "Fermer"),
    ("Quit", "Beenden", "Quitter"),
    ("Error", "Fehler", "Erreur"),
    ("Warning", "Warnung", "Avertissement"),
    ("Password", "Passwort", "Mot de passe"),
    ("User name", "Benutzername", "Nom d'utilisateur"),
    ("Permission denied.", "Zugriff verweigert.", "Permission refusée."),
    ("Please try again.", "Bitte versuche es erneut.", "Veuillez réessayer."),
    (
        "The download is complete.",
        "Der Download ist abgeschlossen.",
        "Le téléchargement est terminé.",
    ),
    ("No network connection.", "Keine Netzwerkverbindung.", "Pas de connexion réseau."),
    ("The battery is low.", "Der Akku ist schwach.", "La batterie est faible."),
)

# Subject-verb-object sentences. Subjects: (English, German, French, person index 0..5).
_SUBJECTS = (
    ("I", "Ich", "Je", 0),
    ("You", "Du", "Tu", 1),
    ("He", "Er", "Il", 2),
    ("She", "Sie", "Elle", 2),
    ("We", "Wir", "Nous", 3),
    ("They", "Sie", "Ils", 5),
)
# Verbs: English (base, 3rd singular), German and French forms by person (ich du er wir ihr sie).
_VERBS = (
    (
        ("see", "sees"),
        ("sehe", "siehst", "sieht", "sehen", "seht", "sehen"),
        ("vois", "vois", "voit", "voyons", "voyez", "voient"),
    ),
    (
        ("have", "has"),
        ("habe", "hast", "hat", "haben", "habt", "haben"),
        ("ai", "as", "a", "avons", "avez", "ont"),
    ),
    (
        ("want", "wants"),
        ("will", "willst", "will", "wollen", "wollt", "wollen"),
        ("veux", "veux", "veut", "voulons", "voulez", "veulent"),
    ),
    (
        ("buy", "buys"),
        ("kaufe", "kaufst", "kauft", "kaufen", "kauft", "kaufen"),
        ("achète", "achètes", "achète", "achetons", "achetez", "achètent"),
    ),
    (
        ("find", "finds"),
        ("finde", "findest", "findet", "finden", "findet", "finden"),
        ("trouve", "trouves", "trouve", "trouvons", "trouvez", "trouvent"),
    ),
    (
        ("like", "likes"),
        ("mag", "magst", "mag", "mögen", "mögt", "mögen"),
        ("aime", "aimes", "aime", "aimons", "aimez", "aiment"),
    ),
)
# Objects: English, German accusative, French (no elided articles).
_OBJECTS = (
    ("the dog", "den Hund", "le chien"),
    ("the cat", "die Katze", "le chat"),
    ("the book", "das Buch", "le livre"),
    ("the house", "das Haus", "la maison"),
    ("the car", "das Auto", "la voiture"),
    ("the apple", "den Apfel", "la pomme"),
    ("the bread", "das Brot", "le pain"),
    ("the table", "den Tisch", "la table"),
    ("the key", "den Schlüssel", "la clé"),
    ("the bag", "die Tasche", "le sac"),
)


def _generated() -> list[tuple[str, str, str]]:
    out = []
    for en_s, de_s, fr_s, person in _SUBJECTS:
        for (en_base, en_third), de_forms, fr_forms in _VERBS:
            en_v = en_third if person == 2 else en_base
            fr_v = fr_forms[person]
            fr_subject = "J'" if fr_s == "Je" and fr_v[0] in "aeiouéè" else fr_s + " "
            for en_o, de_o, fr_o in _OBJECTS:
                out.append(
                    (
                        f"{en_s} {en_v} {en_o}.",
                        f"{de_s} {de_forms[person]} {de_o}.",
                        f"{fr_subject}{fr_v} {fr_o}.",
                    )
                )
    return out


def fallback_pairs(lang: str) -> list[tuple[str, str]]:
    """(English, translation) pairs for `lang` in FALLBACK_LANGS."""
    column = 1 + FALLBACK_LANGS.index(lang)
    return [(row[0], row[column]) for row in (*_PHRASES, *_generated())]
